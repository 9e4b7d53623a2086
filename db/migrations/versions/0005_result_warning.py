"""a result's warning: the status and text of a destination that stored it with a warning

A destination may acknowledge a C-STORE with a warning status (0xB000 coercion of
data elements, 0xB006 elements discarded, 0xB007 data set does not match the SOP
class): the object is delivered (sent, not retried), and the warning is recorded.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warning_status', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('warning', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_column('warning')
        batch_op.drop_column('warning_status')
