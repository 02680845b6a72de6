"""ldapsync: an LDAP directory server that keeps Microsoft 365 in step with it.

Data flow (one LDAP write)::

    client ─BER─▶ ldap/server.py  (protocol edge: decode, controls, result codes)
       └▶ directory/service.py    (rules: schema, access control, diff → ChangeSet)
          └▶ store/entries.py     ONE transaction: entries + index + memberships
                                  (+ hooks, e.g. the Microsoft 365 outbox rows)
             call_after(...)      only after COMMIT
       ◀── result after the commit
"""

__version__ = "0.1.0"
