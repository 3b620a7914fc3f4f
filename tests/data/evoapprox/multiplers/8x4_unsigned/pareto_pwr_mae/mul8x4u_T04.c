/***
* approxrun test circuit (not part of EvoApproxLib): (A & 0xFC) * B, 8-bit A times 4-bit B.
***/
//MAE%=0.27 %
//MAE=11.25
//WCE%=1.10 %
//WCE=45.0
//EP%=70.31 %
//MRE%=3.57 %
//MSE=27125e-2
//PDK45_PWR=0.047 mW
//PDK45_AREA=122.0 um2
//PDK45_DELAY=0.60 ns
#include <stdint.h>
#include <stdlib.h>

uint64_t mul8x4u_T04(const uint64_t A /* 8-bit unsigned operand */,
                     const uint64_t B /* 4-bit unsigned operand, (B) */)
{
   uint64_t O;
   O = (A & 0xFC) * B;
   return O;
}
