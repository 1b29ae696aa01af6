"""The JSON Schema files of the phone-facing messages (read them with ``broker.schemas``)."""
