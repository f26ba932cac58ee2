cdef class Completed:
    pass

cdef Completed COMPLETED
