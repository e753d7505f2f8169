"""Every command line (train, explain, predict, export, convert, explain_history), each a thin layer over the
library; common.py holds what they share."""
