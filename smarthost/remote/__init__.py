"""Remote delivery, after qmail-remote(8), qmail-tcpto(8) and the QMTP/MXPS client patches.

The scheduler's entry point is `RemoteDelivery(root, log).deliver(sender,
recipients, messpath)`: one SMTP (or QMTP) transaction for the recipients of
one domain, one (K|Z|D, text) per recipient. Modules:

    config        the control files, in one snapshot
    routing       smtproutes, qmtproutes, MXPS, the loop check (pure)
    mx            MX/A/AAAA resolution with dnspython's asyncio resolver
    ipme          this host's addresses
    smtp_codec    replies, dot-stuffing, address quoting (pure)
    smtp_session  the SMTP dialogue, without sockets
    qmtp_client   QMTP's package and answers
    tlspolicy     STARTTLS policy and contexts
    tcpto         hosts that did not answer (queue/lock/tcpto)
    transport     asyncio connections with qmail's timeouts
    report        outcomes and qmail-remote's texts and output format
    deliver       the whole run, and RemoteDelivery
"""

from smarthost.remote.deliver import RemoteDelivery, deliver_message

__all__ = ["RemoteDelivery", "deliver_message"]
