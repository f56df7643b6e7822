"""event streams: on PostgreSQL every new job event NOTIFYs its job id, so each API process
wakes its one event feed instead of every stream polling (SQLite: nothing, the feed polls)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 10:30:00
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CHANNEL = "distillery_job_events"  # app/api/events.py listens on it


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # NOTIFY is transactional: delivered when the inserting transaction commits, so a
    # listener that wakes always finds the row.
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION distillery_notify_job_event() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.job_id);
            RETURN NULL;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
        FOR EACH ROW EXECUTE FUNCTION distillery_notify_job_event()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS job_events_notify ON job_events")
    op.execute("DROP FUNCTION IF EXISTS distillery_notify_job_event()")
