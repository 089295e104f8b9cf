"""HTTP endpoints: health checks and the booking API."""
