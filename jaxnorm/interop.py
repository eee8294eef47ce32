"""PyTorch conventions and state-dict conversion. (Placeholder: being written for issue 5.)"""
