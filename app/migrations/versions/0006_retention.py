"""retention: when a job's files were deleted for age; the sweeps table that lets one
reaper at a time run a periodic chore

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 20:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("artifacts_expired_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_index("ix_jobs_expired_finished", "jobs", ["artifacts_expired_at", "finished_at"])
    op.create_table(
        "sweeps",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("sweeps")
    op.drop_index("ix_jobs_expired_finished", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("artifacts_expired_at")
