"""The TLS options ``vmipc migrate --to tcp:`` and ``vmipc receive`` share."""

from __future__ import annotations

import argparse

from vmipc.sequences import Credentials, security_for


def add_tls_arguments(parser: argparse.ArgumentParser, side: str) -> None:
    group = parser.add_argument_group(
        "security (TCP)",
        "TLS 1.3 with mutual authentication: certificates (--tls-cert, --tls-key, --tls-ca) "
        "or a token file shared by both sides. Without either, only a loopback address is "
        "allowed, unless --insecure.",
    )
    group.add_argument("--tls-cert", metavar="PEM", help="this side's certificate")
    group.add_argument("--tls-key", metavar="PEM", help="this side's private key")
    group.add_argument("--tls-ca", metavar="PEM", help="the CA that signed the other side's")
    other = "the receiver's" if side == "sender" else "the sender's"
    default = "the host connected to" if side == "sender" else "any name the CA signed"
    group.add_argument(
        "--tls-peer-name",
        metavar="NAME",
        help=f"{other} certificate name to require (default: {default})",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="a shared secret (at least 16 bytes, mode 600) instead of certificates",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain TCP to or from a non-loopback address: no authentication, no encryption",
    )


def credentials_of(args: argparse.Namespace, host: str) -> Credentials | None:
    """The credentials the options give (None: plain TCP); CredentialsError if unusable."""
    return security_for(
        host,
        cert=args.tls_cert,
        key=args.tls_key,
        ca=args.tls_ca,
        peer_name=args.tls_peer_name,
        token_file=args.token_file,
        insecure=args.insecure,
    )
