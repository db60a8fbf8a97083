"""admin flag, one-day password, user agent

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('admin', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('one_day_code_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('one_day_valid_on', sa.Date(), nullable=True))

    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('user_agent', sa.String(length=300), nullable=True))



def downgrade():
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_column('user_agent')

    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_column('one_day_valid_on')
        batch_op.drop_column('one_day_code_hash')
        batch_op.drop_column('admin')

