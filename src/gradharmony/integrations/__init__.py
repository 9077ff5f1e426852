"""Bridges to other libraries; each module imports its library and is imported only on request."""
