"""Tenants and API keys; every session belongs to a tenant; session names unique per tenant.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

- ``tenants`` (id, name unique, created_at), with the tenant ``local`` (id ``local``): the owner
  of every existing session, of sessions made without a tenant (the CLI chat) and of every
  request while auth is off.
- ``api_keys`` (id, tenant_id -> tenants ON DELETE CASCADE, name, prefix, hash unique,
  created_at, revoked_at, last_used_at). ``hash`` is the SHA-256 (hex) of the key: keys are
  random 32-byte tokens, so a fast hash is enough (nothing to brute-force, unlike a password).
- ``chat_sessions.tenant_id`` (NOT NULL, -> tenants), existing rows assigned to ``local``; the
  unique constraint on ``name`` becomes one on ``(tenant_id, name)``.

Constraint names follow 0001 (PostgreSQL's own names for unnamed constraints, so that a database
made by ``create_all`` agrees). SQLite cannot alter constraints in place: the ``chat_sessions``
changes run in batch mode (the table is copied); a naming convention gives the unnamed unique
constraint of a database made by the old ``create_all`` (stamped at 0001) the name this
migration drops.

Downgrade: fails while two sessions of different tenants share a name (the old constraint cannot
hold); rename or delete one first.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCAL_TENANT_ID = "local"  # memory_store.models.LOCAL_TENANT_ID, spelled out: migrations are frozen
# PostgreSQL's names for unnamed constraints, for reflected unnamed ones (SQLite, batch mode)
NAMING = {
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
}


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("tenants_pkey")),
        sa.UniqueConstraint("name", name=op.f("tenants_name_key")),
    )
    op.bulk_insert(
        tenants, [{"id": LOCAL_TENANT_ID, "name": "local", "created_at": datetime.now(UTC)}]
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("api_keys_pkey")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("api_keys_tenant_id_fkey"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("hash", name=op.f("api_keys_hash_key")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"], unique=False)
    op.create_index(op.f("ix_api_keys_prefix"), "api_keys", ["prefix"], unique=False)

    # existing sessions go to the local tenant (the server default fills them, then goes)
    with op.batch_alter_table("chat_sessions", naming_convention=NAMING) as batch:
        batch.add_column(
            sa.Column(
                "tenant_id",
                sa.String(length=32),
                nullable=False,
                server_default=sa.text(f"'{LOCAL_TENANT_ID}'"),
            )
        )
    with op.batch_alter_table("chat_sessions", naming_convention=NAMING) as batch:
        batch.alter_column("tenant_id", existing_type=sa.String(length=32), server_default=None)
        batch.drop_constraint("chat_sessions_name_key", type_="unique")
        batch.create_unique_constraint(
            op.f("chat_sessions_tenant_id_name_key"), ["tenant_id", "name"]
        )
        batch.create_foreign_key(
            op.f("chat_sessions_tenant_id_fkey"), "tenants", ["tenant_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("chat_sessions", naming_convention=NAMING) as batch:
        batch.drop_constraint("chat_sessions_tenant_id_fkey", type_="foreignkey")
        batch.drop_constraint("chat_sessions_tenant_id_name_key", type_="unique")
        batch.create_unique_constraint(op.f("chat_sessions_name_key"), ["name"])
        batch.drop_column("tenant_id")
    op.drop_index(op.f("ix_api_keys_prefix"), table_name="api_keys")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
