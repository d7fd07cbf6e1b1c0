"""From features to a subset: influence (eq. 3), the consensus vote (eq. 4), analysis."""
