"""one account per username, whatever its case; accounts found by email

Revision ID: 0005
Revises: 0004

Logins look an account up by ``lower(username)`` (``idp.accounts.with_bindings``,
``by_username``), and a forgotten password by ``lower(email)``: without indexes on
those expressions each read the whole accounts table. The username's is unique: two
usernames that differ only in case could not be told apart at login.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    clashes = op.get_bind().execute(sa.text(
        "SELECT min(username), max(username) FROM accounts GROUP BY lower(username) HAVING count(*) > 1")).all()
    if clashes:
        raise RuntimeError(
            "Migration 0005 makes usernames unique whatever their case, and these accounts differ only in case: "
            + "; ".join(f"{a} / {b}" for a, b in clashes)
            + ". Rename or remove all but one of each (in the accounts table), then start again.")
    op.create_index('ix_accounts_username_lower', 'accounts', [sa.text('lower(username)')], unique=True)
    op.create_index('ix_accounts_email_lower', 'accounts', [sa.text('lower(email)')])


def downgrade():
    op.drop_index('ix_accounts_email_lower', table_name='accounts')
    op.drop_index('ix_accounts_username_lower', table_name='accounts')
