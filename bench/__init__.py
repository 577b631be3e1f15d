"""`sdxl-split bench`: the seed technique table, each row measured in a fresh process."""
