"""Initial schema: the tables of memory_store.models.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

This is the schema `memory_store.persistence.create_schema` (``create_all``) made before
migrations existed; `app.db.upgrade_database` stamps such a database at this revision.

Constraint names: `Base.metadata` has no naming convention, so ``create_all`` leaves constraints
unnamed and PostgreSQL names them ``<table>_pkey``, ``<table>_<columns>_key`` (unique) and
``<table>_<column>_fkey``. The same names are spelled out here, so that a PostgreSQL database made
by this migration and one made by ``create_all`` agree and a later migration can drop or alter a
constraint by one name. The index name is SQLAlchemy's default ``ix_<table>_<column>``.

Types: LargeBinary is BLOB on SQLite and bytea on PostgreSQL; DateTime(timezone=True) is
``timestamp with time zone`` on PostgreSQL (SQLite stores text); JSON is JSON (not JSONB).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _session_fk(table: str) -> sa.ForeignKeyConstraint:
    """``session_id`` -> ``chat_sessions.id``; deleting a session deletes its rows."""
    return sa.ForeignKeyConstraint(
        ["session_id"],
        ["chat_sessions.id"],
        name=op.f(f"{table}_session_id_fkey"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "chat_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("memory_seq", sa.BigInteger(), nullable=False),
        sa.Column("memory_turn", sa.Integer(), nullable=False),
        sa.Column("memory_next_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_next_knn_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_shape", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("chat_sessions_pkey")),
        sa.UniqueConstraint("name", name=op.f("chat_sessions_name_key")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("location", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("messages_pkey")),
        _session_fk("messages"),
        sa.UniqueConstraint("session_id", "seq", name=op.f("messages_session_id_seq_key")),
    )
    op.create_index(op.f("ix_messages_session_id"), "messages", ["session_id"], unique=False)
    op.create_table(
        "memory_chunks",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("heads", sa.LargeBinary(), nullable=False),
        sa.Column("entry_ids", sa.LargeBinary(), nullable=False),
        sa.Column("keys", sa.LargeBinary(), nullable=False),
        sa.Column("values", sa.LargeBinary(), nullable=False),
        sa.Column("message_ids", sa.LargeBinary(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("positions", sa.LargeBinary(), nullable=False),
        sa.Column("turn_written", sa.LargeBinary(), nullable=False),
        sa.Column("s0", sa.LargeBinary(), nullable=False),
        sa.Column("refreshed", sa.LargeBinary(), nullable=False),
        sa.Column("attention", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "seq", "layer", name=op.f("memory_chunks_pkey")),
        _session_fk("memory_chunks"),
    )
    op.create_table(
        "knn_chunks",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("entry_ids", sa.LargeBinary(), nullable=False),
        sa.Column("hidden", sa.LargeBinary(), nullable=False),
        sa.Column("next_token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("message_ids", sa.LargeBinary(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("positions", sa.LargeBinary(), nullable=False),
        sa.Column("turn_written", sa.LargeBinary(), nullable=False),
        sa.Column("s0", sa.LargeBinary(), nullable=False),
        sa.Column("refreshed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "seq", name=op.f("knn_chunks_pkey")),
        _session_fk("knn_chunks"),
    )
    op.create_table(
        "memory_states",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("slots", sa.LargeBinary(), nullable=False),
        sa.Column("entry_ids", sa.LargeBinary(), nullable=False),
        sa.Column("s0", sa.LargeBinary(), nullable=False),
        sa.Column("refreshed", sa.LargeBinary(), nullable=False),
        sa.Column("attention", sa.LargeBinary(), nullable=False),
        sa.Column("n_drop", sa.Integer(), nullable=False),
        sa.Column("drop_slots", sa.LargeBinary(), nullable=False),
        sa.Column("drop_ids", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "seq", "part", name=op.f("memory_states_pkey")),
        _session_fk("memory_states"),
    )
    op.create_table(
        "message_states",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("n_kv_heads", sa.Integer(), nullable=False),
        sa.Column("head_dim", sa.Integer(), nullable=False),
        sa.Column("hidden_dim", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("keys", sa.LargeBinary(), nullable=False),
        sa.Column("values", sa.LargeBinary(), nullable=False),
        sa.Column("hidden", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "message_id", name=op.f("message_states_pkey")),
        _session_fk("message_states"),
    )


def downgrade() -> None:
    # children before chat_sessions, which their foreign keys reference
    op.drop_table("message_states")
    op.drop_table("memory_states")
    op.drop_table("knn_chunks")
    op.drop_table("memory_chunks")
    op.drop_index(op.f("ix_messages_session_id"), table_name="messages")
    op.drop_table("messages")
    op.drop_table("chat_sessions")
