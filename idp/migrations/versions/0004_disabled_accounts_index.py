"""disabled accounts index

Revision ID: 0004
Revises: 0003

The processes rewrite the store marks of the disabled accounts every minute
(``idp.accounts.mark_disabled_accounts``): a partial index makes that a read
of the few disabled rows, not of every account.
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_index('ix_accounts_disabled', 'accounts', ['id'],
                    postgresql_where=sa.text('disabled'), sqlite_where=sa.text('disabled'))


def downgrade():
    op.drop_index('ix_accounts_disabled', table_name='accounts')
