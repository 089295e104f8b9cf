"""The end-of-call report: a versioned record of one call built from its transcript, with analysis.

Pure domain code: nothing here reads the environment or does I/O (an analyser that calls a model is
passed in through :class:`booking.reports.ports.Analyser`). The package keeps this module empty so
``booking.business`` can import the shared vocabulary without importing the builder.
"""
