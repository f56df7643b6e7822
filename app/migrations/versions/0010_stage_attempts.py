"""job_stages.attempts: each attempt at a stage (start, end, seconds), so that a stage run
again after its worker died keeps its first start and its real duration

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 10:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_stages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attempts", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("job_stages", schema=None) as batch_op:
        batch_op.drop_column("attempts")
