"""Loopback simulators of the providers' wire protocols, for tests, load tests and the offline demo."""
