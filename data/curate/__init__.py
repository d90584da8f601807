"""Curation: raw footage to scored, filtered, captioned clips and shards (`python -m data.curate`)."""
