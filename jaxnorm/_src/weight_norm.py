"""Weight and spectral normalization. (Placeholder: being written for issue 4.)"""


def weight_norm_init(w, *, axis=-1):
  raise NotImplementedError


def weight_norm(wn, *, axis=-1):
  raise NotImplementedError


def weight_norm_data_init(wn, t, *, eps=1e-6):
  raise NotImplementedError


def spectral_norm_init(w, key):
  raise NotImplementedError


def spectral_norm(w, state, *, n_steps=1, train=True, eps=1e-12):
  raise NotImplementedError
