"""tspo.train"""
