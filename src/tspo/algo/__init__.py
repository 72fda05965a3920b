"""tspo.algo"""
