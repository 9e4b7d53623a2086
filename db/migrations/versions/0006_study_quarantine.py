"""study quarantine: why a study's planning failed, and when

A study whose jobs cannot be planned (its routes cannot be evaluated, e.g. an
unreadable instance file) is quarantined with the reason instead of being tried
again every sweep; an admin retries it (clearing both columns) or deletes it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quarantine_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('quarantined_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('quarantined_at')
        batch_op.drop_column('quarantine_reason')
