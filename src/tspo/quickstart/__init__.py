"""The quickstart pipeline: world, tiny policy, SFT, RL, report; and `tspo compare`."""
