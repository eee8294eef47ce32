"""Placeholder: being written for issue 8."""

BatchNorm = BatchRenorm = GroupNorm = InstanceNorm = LayerNorm = RMSNorm = None
