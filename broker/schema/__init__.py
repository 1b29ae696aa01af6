"""The JSON Schema files of the phone-facing messages (read them with ``broker.schemas``).

``python -m broker.schema_gen`` writes every file here from ``broker/messages.py``.
"""
