/* Byte copies with non-temporal (streaming) stores, for ckpt_plugins.persist.hashed_copy.
 *
 * A checkpoint's copy goes to memory that was last written one or more saves ago (a staging
 * block, the next memory-tier slot), so its cache lines are not in cache. An ordinary store then
 * reads each line from memory before overwriting it (a read-for-ownership): three memory
 * transfers per byte copied instead of two. glibc's memmove streams only copies above its
 * non-temporal threshold (3/4 of the shared cache per thread: about 190 MiB on the benchmark
 * machine), which a copy split into pieces for several threads never reaches. Measured there
 * (docs/memory_tier.md): 64 MiB into rotating /dev/shm slots took 3.5-3.9 ms by memmove and
 * 2.6 ms with streaming stores, as fast as into a buffer still in cache.
 *
 * copy(dst, src, nbytes): addresses as integers; the GIL is released. Streams when nbytes is at
 * least STREAM_MIN and the CPU has SSE2 (every x86-64), else memmove; ends with a store fence so
 * that another thread that synchronises with this one afterwards sees every byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAM 1
#else
#define HAVE_STREAM 0
#endif

#define STREAM_MIN (256 * 1024)

static void copy_bytes(char *dst, const char *src, size_t n)
{
#if HAVE_STREAM
    if (n >= STREAM_MIN && (dst + n <= src || src + n <= dst)) {
        size_t head = (size_t)(-(uintptr_t)dst & 63); /* to the next 64-byte boundary */
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        size_t body = n & ~(size_t)63;
        for (size_t i = 0; i < body; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        _mm_sfence();
        memcpy(dst + body, src + body, n - body);
        return;
    }
#endif
    memmove(dst, src, n);
}

static PyObject *stream_copy(PyObject *self, PyObject *args)
{
    unsigned long long dst, src;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKn:copy", &dst, &src, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "copy(): nbytes must be >= 0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    copy_bytes((char *)(uintptr_t)dst, (const char *)(uintptr_t)src, (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", stream_copy, METH_VARARGS,
     "copy(dst, src, nbytes): copy nbytes from address src to address dst, with streaming stores "
     "when the copy is large (see the module); the GIL is released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stream_copy",
    "Byte copies with non-temporal stores (see ckpt_plugins.persist.hashed_copy).", -1, methods,
};

PyMODINIT_FUNC PyInit__stream_copy(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "STREAMS", HAVE_STREAM) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (m && PyModule_AddIntConstant(m, "STREAM_MIN", STREAM_MIN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
