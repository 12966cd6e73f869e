"""`ditplan profile`: measure this machine and write a cluster profile the cost model reads.

The only part of costmodel that imports torch, and only when a measurement runs: importing this
package (or `costmodel.profiler.fit` / `.profile_file`) stays torch-free.

    from costmodel.profiler.run import profile_machine
    path = profile_machine("this-machine.yaml", process_counts=(2,))
"""
