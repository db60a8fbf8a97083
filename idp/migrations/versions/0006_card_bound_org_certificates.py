"""Organisation certificates bound by the card, national ID numbers in upper case.

An organisation certificate (XCA/GCA) was bound by its organisation id, which every
card of the organisation shares: any of them logged in to the account that had bound
one. Such bindings are deleted; the AA account logs in with its OTP (which M1 made it
bind) and binds its card again, now by the certificate's serial number.

National ID numbers were stored as typed; the mobile-ID login looks for them in upper
case. They are upper-cased, unless two accounts would then share one.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    bind = op.get_bind()
    bind.execute(sa.text("DELETE FROM bindings WHERE factor = 'certificate' AND external_id LIKE '%|org:%'"))
    clashes = bind.execute(sa.text(
        "SELECT min(username), max(username) FROM accounts WHERE national_id IS NOT NULL "
        "GROUP BY upper(national_id) HAVING count(*) > 1")).all()
    if clashes:
        raise RuntimeError(
            "Migration 0006 stores national ID numbers in upper case, and these accounts hold one that differs "
            "only in case: " + "; ".join(f"{a} / {b}" for a, b in clashes)
            + ". Clear the national_id of the wrong one of each (in the accounts table), then start again.")
    bind.execute(sa.text("UPDATE accounts SET national_id = upper(national_id) WHERE national_id <> upper(national_id)"))


def downgrade():
    pass  # the deleted bindings were unsafe; upper case is what every reader expects
