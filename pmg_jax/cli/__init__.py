"""Every command line (train, explain, predict, export, convert), each a thin layer over the library; common.py holds
what they share."""
