.PHONY: test lint format bench bench-gpu bench-host inspect

test:
	python -m pytest

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

bench:
	python -m pytest bench --benchmark-only

inspect:
	python -m bench.inspect --arch 90
	python -m bench.inspect --arch 80

bench-gpu:
	PYTHONPATH=. python -m bench.gpu_suite

bench-host:
	PYTHONPATH=. python -m bench.host_time --out bench/results
