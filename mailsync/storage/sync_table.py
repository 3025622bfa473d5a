"""Sync state in Azure Tables: folder cursors, leases, dirty flags, and mailbox slots.

One table (``<prefix>sync``), one partition per account, so every account's
state is a handful of rows that one query returns:

===================  ===============================================================
RowKey               what it holds
===================  ===============================================================
``folders``          the folder-list cursor (same fields as a folder row)
``f:<folder id>``    one folder: opaque provider cursor, phase, epoch, counts,
                     dirty / resync flags, lease (owner + until), back-off
``slot:<n>``         one of the mailbox's request slots (owner + until)
``pending``          the account's notifications awaiting their NOTIFIED job, written by
                     the webhook (``mailsync.storage.subscriptions.TablePendingStore``):
                     here so the job reads it with the rows its first round needs
===================  ===============================================================

Nothing here is written per email: a folder row changes once per page of
changes (the cursor save, which also renews the lease), a slot twice per
worker invocation.

Its rules live in a module each, assembled here into ``SyncStateTable``:

* ``sync_table_access``: the table client, the reads, the conditional-write plumbing;
* ``unleased_writes``: rows created, display fields, marks, look-agains, deletions;
* ``folder_leases``: a folder's lease and ``dirty`` protocol (one worker pages a folder at a time);
* ``mailbox_slots``: the mailbox's request slots, and the transactions taking or giving
  back a slot with a folder's lease.

The rows' records and their entity mapping are ``mailsync.storage.sync_rows``.
"""

from __future__ import annotations

from mailsync.storage.mailbox_slots import MailboxSlots
from mailsync.storage.unleased_writes import UnleasedWrites


class SyncStateTable(UnleasedWrites, MailboxSlots):
    """The cursor/lease/slot table: the rules of the modules above on one table client. Thread-safe (the
    table client is)."""
