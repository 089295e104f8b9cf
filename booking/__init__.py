"""The booking domain: business configuration, availability, the Redis free/busy index, the SQL ledger
and the booking service. Imports neither ``voice_server`` nor ``integrations``."""
