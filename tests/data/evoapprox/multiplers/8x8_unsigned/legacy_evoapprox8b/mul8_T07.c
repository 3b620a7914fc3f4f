/* approxrun test circuit (not part of EvoApproxLib): exact 8x8 unsigned product, legacy-style name. */
#include <stdint.h>

uint16_t mul8_T07(uint8_t A, uint8_t B)
{
  return (uint16_t)(A * B);
}
