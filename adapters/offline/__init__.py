"""Offline adaptation, apart from serving: conversion to ONNX, parity reports, quantization."""
