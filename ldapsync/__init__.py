"""ldapsync: an LDAP directory server that keeps Microsoft 365 in step with it.

Data flow (one LDAP write)::

    client ─BER─▶ ldap/server.py  (protocol edge: decode, controls, result codes)
       └▶ directory/facade.py    (rules: schema, access control)
          └▶ directory/writes.py  ONE transaction: entries + index + memberships (store/entries.py),
                                  then the write hooks (directory/hooks.py: the Microsoft 365
                                  outbox rows, activation links)
             call_after(...)      only after COMMIT
       ◀── result after the commit

See docs/architecture.md for the two processes and the whole path.
"""

__version__ = "0.1.0"
