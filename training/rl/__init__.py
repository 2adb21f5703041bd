"""Reinforcement learning: GRPO's objective, rewards, rollouts."""
