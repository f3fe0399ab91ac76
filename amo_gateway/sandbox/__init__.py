"""An in-project stand-in for amoCRM's OAuth and API, faithful to the upstream rules the gateway must obey."""

from amo_gateway.sandbox.app import create_sandbox_app
from amo_gateway.sandbox.config import SandboxAccount, SandboxConfig
from amo_gateway.sandbox.resolver import LoopbackResolver
from amo_gateway.sandbox.state import SANDBOX_STATE, SandboxState

__all__ = ["SANDBOX_STATE", "LoopbackResolver", "SandboxAccount", "SandboxConfig", "SandboxState", "create_sandbox_app"]
