"""Persistence of experiments, rounds and devices."""

from aggregator_service.persistence.database import Database, DatabaseError
from aggregator_service.persistence.records import (
    DeviceRecord,
    ExperimentRecord,
    RoundRecord,
    RoundSummary,
)

__all__ = [
    "Database",
    "DatabaseError",
    "DeviceRecord",
    "ExperimentRecord",
    "RoundRecord",
    "RoundSummary",
]
