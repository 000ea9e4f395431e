"""The Condenser: backbone and head, its encodings (padded, length groups, packed rows), warm starts, export."""
