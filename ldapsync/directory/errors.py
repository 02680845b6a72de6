"""LDAP result codes and the one error type the directory layer raises.

Everything below the protocol edge (schema checks, access control, the store's
callers) reports a refusal by raising :class:`LDAPError` with a result code
from :class:`ResultCode` and a message a person can act on.  The protocol edge
(`ldapsync.ldap`) turns it into an LDAPResult; nothing here knows about BER.
"""

from __future__ import annotations

from enum import IntEnum


class ResultCode(IntEnum):
    success = 0
    operationsError = 1
    protocolError = 2
    timeLimitExceeded = 3
    sizeLimitExceeded = 4
    compareFalse = 5
    compareTrue = 6
    authMethodNotSupported = 7
    strongerAuthRequired = 8
    referral = 10
    adminLimitExceeded = 11
    unavailableCriticalExtension = 12
    confidentialityRequired = 13
    saslBindInProgress = 14
    noSuchAttribute = 16
    undefinedAttributeType = 17
    inappropriateMatching = 18
    constraintViolation = 19
    attributeOrValueExists = 20
    invalidAttributeSyntax = 21
    noSuchObject = 32
    aliasProblem = 33
    invalidDNSyntax = 34
    aliasDereferencingProblem = 36
    inappropriateAuthentication = 48
    invalidCredentials = 49
    insufficientAccessRights = 50
    busy = 51
    unavailable = 52
    unwillingToPerform = 53
    loopDetect = 54
    namingViolation = 64
    objectClassViolation = 65
    notAllowedOnNonLeaf = 66
    notAllowedOnRDN = 67
    entryAlreadyExists = 68
    objectClassModsProhibited = 69
    affectsMultipleDSAs = 71
    other = 80
    cancelled = 118
    noSuchOperation = 119


class LDAPError(Exception):
    """A refusal with an LDAP result code.

    ``message`` is shown to the client as the diagnostic message, so it must
    never contain a password, token or secret.  ``matched_dn`` is set for
    noSuchObject (the deepest existing ancestor, RFC 4511 §4.1.9).
    """

    def __init__(self, code: ResultCode | int, message: str = "", matched_dn: str = "") -> None:
        super().__init__(message)
        self.code = ResultCode(code)
        self.message = message
        self.matched_dn = matched_dn

    def __repr__(self) -> str:
        return f"LDAPError({self.code.name}, {self.message!r})"

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name
