"""The UV unwrapper's child process: ``python _xatlas_child.py IN.npz OUT.npz`` (see :mod:`backend.geometry.uv`).

Runs xatlas on one mesh and writes its atlas. It imports only numpy and xatlas, so it starts in a fraction of a
second; it is a separate process because xatlas can crash (a segmentation fault on some large meshes), which must
not take the backend down. Nothing here imports the backend package.
"""

import os
import sys

import numpy as np


def main(inp: str, out: str) -> int:
    import xatlas

    with np.load(inp) as d:
        # xatlas needs exactly float32 positions and uint32 indices (float64 / int64 input crashes it)
        vertices = np.ascontiguousarray(d["vertices"], dtype=np.float32)
        faces = np.ascontiguousarray(d["faces"], dtype=np.uint32)
        resolution = int(d["resolution"])
        padding = int(d["padding"])
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = resolution  # texels per unit estimated to fill about resolution^2
    pack.padding = padding  # texels between charts: room for the bake's padding ring and bilinear filtering
    pack.bilinear = True
    atlas.generate(chart, pack)
    vmapping, indices, uvs = atlas.get_mesh(0)
    tmp = out + ".part.npz"
    np.savez(tmp, vmapping=np.asarray(vmapping, dtype=np.int64), indices=np.asarray(indices, dtype=np.int64),
             uvs=np.asarray(uvs, dtype=np.float32), width=int(atlas.width), height=int(atlas.height),
             charts=int(atlas.chart_count), atlases=int(atlas.atlas_count),
             utilization=float(np.mean(np.atleast_1d(atlas.utilization))))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
