"""Dropout. (Placeholder: being written for issue 4.)"""


def dropout(key, x, rate, *, train=True, broadcast_dims=()):
  raise NotImplementedError("dropout is being written (issue 4)")
