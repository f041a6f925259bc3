"""Training on many devices and hosts with `jax.sharding`.

The mesh has two axes: `data` and `fsdp`. The batch is split over both (every device sees
batch / devices examples); with fsdp > 1 the parameters, EMA and optimiser state are also split
over the `fsdp` axis (each large array along its largest divisible dimension), so a model that
does not fit one device trains on several. XLA's SPMD partitioner inserts the collectives: the
math is that of one device, so the loss and EMA agree with a single-device run up to
floating-point summation order.

Several hosts: every process runs the same command after `jax.distributed.initialize`; each
loads its own rows of the global batch.
"""

import dataclasses
import math

import equinox as eqx
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..core.errors import RepaError

BATCH_AXES = ("data", "fsdp")


class MeshError(RepaError, ValueError):
    """A mesh that the devices of this run cannot form."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int

    @property
    def devices(self) -> int:
        return self.data * self.fsdp


def mesh_shape(data: int, fsdp: int, num_devices: int) -> MeshShape:
    """Resolve `data = -1` (all the devices fsdp leaves) and check the product. A smaller
    explicit mesh uses the first data x fsdp devices (one host only)."""
    if fsdp < 1 or (data < 1 and data != -1):
        raise MeshError(f"mesh: fsdp must be >= 1 and data >= 1 or -1, got {data} x {fsdp}")
    if data == -1:
        if num_devices % fsdp:
            raise MeshError(f"mesh: fsdp = {fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    if data * fsdp > num_devices or (data * fsdp < num_devices and jax.process_count() > 1):
        raise MeshError(
            f"mesh: data x fsdp = {data} x {fsdp} = {data * fsdp} devices, but this run has "
            f"{num_devices} (set mesh.data = -1 to use them all)"
        )
    return MeshShape(data, fsdp)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    grid = mesh_utils.create_device_mesh((shape.data, shape.fsdp), devices[: shape.devices])
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Split the largest dimension that `fsdp` divides (the last one on ties); small arrays
    (fewer than `min_size` elements) and indivisible ones stay replicated."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def state_shardings(tree, mesh: Mesh, min_size: int = 2**14):
    """A pytree of NamedShardings for the array leaves of `tree` (arrays or `eval_shape`
    structs; other leaves stay None)."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        if _is_key(x):
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size))

    return jax.tree.map(
        one,
        eqx.filter(tree, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def place(tree, shardings):
    """Put host (or single-device) arrays that every process holds in full onto `shardings`
    (a matching pytree, or one sharding for all); each process supplies its own shards."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if _is_key(x):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """One global jax.Array per entry from this process's rows (all of them on one host)."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise MeshError(
            f"data.batch_size {batch_size} is not divisible by the {devices} devices of the mesh"
        )
    if batch_size % jax.process_count():
        raise MeshError(f"data.batch_size {batch_size} is not divisible by the process count")


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize`: with no arguments it reads the cluster from the
    environment (SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID)."""
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def describe(mesh: Mesh, batch_size: int) -> str:
    devices = mesh.devices.size
    kinds = sorted({d.device_kind for d in np.asarray(mesh.devices).flat})
    return (
        f"{devices} device(s) ({', '.join(kinds)}) on {jax.process_count()} process(es); "
        f"mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}; "
        f"global batch {batch_size} = {batch_size // devices} per device"
    )
