"""The HTTP face of the service: REST API under /api/v1 and the dashboard."""
