# Installed as twisted/plugins/ldapsync_plugin.py: twistd lists "ldapsync"
# without importing anything of ours until the service is actually made.
from twisted.application.service import ServiceMaker

ldapsync = ServiceMaker(
    "ldapsync",
    "ldapsync.tap",
    "LDAP directory server that keeps Microsoft 365 in step with it",
    "ldapsync",
)
