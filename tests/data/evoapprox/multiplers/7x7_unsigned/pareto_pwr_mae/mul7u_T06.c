/***
* approxrun test circuit (not part of EvoApproxLib): 7x7 unsigned product with bit 0 dropped.
* No metric lines in this header.
***/
#include <stdint.h>

uint16_t mul7u_T06(uint8_t A, uint8_t B)
{
  return (uint16_t)((A * B) & 0x3FFE);
}
