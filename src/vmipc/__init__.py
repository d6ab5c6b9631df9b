"""vmipc: small building-block control commands for a KVM VMM, composed by the client."""

__version__ = "0.1.0"
