"""Adapters to outside providers (Twilio, Deepgram, OpenAI, Google Calendar, Airtable) and their
loopback simulators. Each adapter implements a port of ``booking`` or ``voice_server``; only the app
factory wires them in. Providers arrive with the telephony, speech and effects work."""
