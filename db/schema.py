"""The queue's tables: studies, series, instances, jobs and outgoing results (the outbox).

Times are naive UTC datetimes. Each job and each outgoing result is an explicit
state machine (status Enum, attempts, timestamps, last error).
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class ResultStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    """Claimed by one sender (lease owner) until it records the outcome or its lease expires."""
    SENT = "sent"
    FAILED = "failed"


class ResultKind(enum.StrEnum):
    """The kinds of result object the node writes, one series each.

    The value names the kind in series descriptions, file names, UID derivation
    and the ``results.kind`` column; for SEG and SR it is also the DICOM Modality
    (see :attr:`modality`). ``node.results`` re-exports it.
    """

    SEG = "SEG"
    """BINARY Segmentation of the model's segments."""
    SR = "SR"
    """TID 1500 measurement report (Comprehensive 3D SR)."""
    HEATMAP = "HEATMAP"
    """FRACTIONAL Segmentation of the class-activation heatmaps."""
    SC = "SC"
    """Secondary-capture "AI result" images with burned-in overlays and legend."""

    @property
    def modality(self) -> str:
        """The DICOM Modality of this kind's objects."""
        return _MODALITIES[self]

    @property
    def series_offset(self) -> int:
        """Offset added to a job's base Series Number for this kind's series."""
        return _SERIES_OFFSETS[self]

    @property
    def multi_instance(self) -> bool:
        """Whether one result of this kind may have several instances (SC images)."""
        return self is ResultKind.SC


#: DICOM Modality per result kind.
_MODALITIES = {ResultKind.SEG: "SEG", ResultKind.SR: "SR", ResultKind.HEATMAP: "SEG",
               ResultKind.SC: "OT"}

#: Series Number offset per result kind; existing offsets never change.
_SERIES_OFFSETS = {ResultKind.SEG: 1, ResultKind.SR: 2, ResultKind.HEATMAP: 3, ResultKind.SC: 4}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16,
                values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)
    completed_at: Mapped[datetime | None]
    runs: Mapped[int] = mapped_column(Integer, default=0)
    quarantine_reason: Mapped[str | None] = mapped_column(Text)
    """Why planning its jobs failed (e.g. an unreadable instance file); None when not
    quarantined. A quarantined study is left out of the completion sweep until an
    admin retries it (which clears this) or deletes it."""
    quarantined_at: Mapped[datetime | None]

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None]
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime]
    pending: Mapped[bool] = mapped_column(default=True, index=True)
    """True while the series has instances that no run has covered yet."""
    runs: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    """Relative to the storage directory."""
    size: Mapped[int]
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime]

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_id", "model", "run", name="uq_jobs_series_model_run"),
        Index("ix_jobs_status_not_before", "status", "not_before"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Names of the destinations the results go to, in route order (a JSON list)."""
    run: Mapped[int] = mapped_column(Integer)
    uid_seed: Mapped[str] = mapped_column(String(64))
    """Seed of the result UIDs: a re-run after a crash produces the same UIDs."""
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    not_before: Mapped[datetime | None]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)

    series: Mapped[Series] = relationship()
    results: Mapped[list[Result]] = relationship(back_populates="job")


class Result(Base):
    """One produced DICOM object for one destination: the outbox."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_results_dest_sop"),
        Index("ix_results_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    status: Mapped[ResultStatus] = mapped_column(_enum(ResultStatus, "result_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    warning_status: Mapped[int | None] = mapped_column(Integer)
    """The destination's warning status (0xBxxx, e.g. 0xB000 coercion of data elements) when it
    stored the object with a warning; None for a plain success."""
    warning: Mapped[str | None] = mapped_column(Text)
    """What the warning status means, and the destination's error comment if it sent one."""

    job: Mapped[Job] = relationship(back_populates="results")
