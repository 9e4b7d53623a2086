"""a job's destinations as a JSON list instead of comma-joined text

``jobs.destinations`` held the destination names joined by commas ("pacs,backup",
"" for none); it now holds a JSON list (["pacs", "backup"], [] for none). The
upgrade converts every row; the downgrade joins the lists again.

The new column is added beside the old one, filled, and then takes its name, so
no database has to cast text to JSON (SQLite would cast it to a number).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_STAGING = 'destinations_staged'


def split_names(text: object) -> list[str]:
    """The names of a comma-joined destination list ("" gives none)."""
    return [name for name in str(text or '').split(',') if name]


def join_names(names: object) -> str:
    """The comma-joined text of a JSON list of names (a driver may hand it over as text)."""
    if isinstance(names, str):
        names = json.loads(names)
    return ','.join(str(name) for name in names) if isinstance(names, list) else ''


def _replace(old_type: sa.types.TypeEngine[Any], new_type: sa.types.TypeEngine[Any],
             convert: Callable[[object], object]) -> None:
    """Give ``jobs.destinations`` ``new_type``, converting each row's value with ``convert``."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column(_STAGING, new_type, nullable=True))
    jobs = sa.table('jobs', sa.column('id', sa.Integer()),
                    sa.column('destinations', old_type), sa.column(_STAGING, new_type))
    conn = op.get_bind()
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.destinations)).all()
    if rows:
        conn.execute(
            sa.update(jobs).where(jobs.c.id == sa.bindparam('job_id'))
            .values({_STAGING: sa.bindparam('value', type_=new_type)}),
            [{'job_id': job_id, 'value': convert(value)} for job_id, value in rows])
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('destinations')
        batch_op.alter_column(_STAGING, new_column_name='destinations', existing_type=new_type,
                              nullable=False)


def upgrade() -> None:
    _replace(sa.Text(), sa.JSON(), split_names)


def downgrade() -> None:
    _replace(sa.JSON(), sa.Text(), join_names)
