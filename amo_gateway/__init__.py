"""amo-gateway: owns an amoCRM/Kommo OAuth connection and hands working access to the rest of the stack."""

__version__ = "0.1.0"
